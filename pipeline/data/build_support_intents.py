"""Generate the project's shipped customer-support intent data set (support_intents.jsonl).

The data set is synthetic and written by this project: every utterance comes from hand-written
sentence templates (at least 25 English and 40 Chinese per intent, written as customers type into
a shop's support chat, most of them naming no order) whose slots are filled from lists of fake
order numbers, products, cities, dates, payment methods and so on, then dressed with greetings and
sign-offs, the odd emoji, lower-case/no-punctuation typing, English typos, Chinese homophone slips
and English words inside Chinese. A fixed seed drives one ``random.Random``, so running the script
again writes a byte-identical file. Utterances are de-duplicated after normalisation (NFKC, case-folded,
punctuation and symbols removed, whitespace collapsed) and generation tops up until every intent
reaches its target count.

Regenerate (from the repository root):

    python pipeline/data/build_support_intents.py

It writes ``support_intents.jsonl`` next to this script: one JSON object per line with exactly
the keys ``text`` and ``label``, UTF-8, in a seeded shuffled order. Standard library only.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20240611
OUTPUT = Path(__file__).resolve().parent / "support_intents.jsonl"
MAX_CHARS = 200
MIN_PER_INTENT = 120
MAX_PER_INTENT = 200
MIN_TOTAL = 1400
MIN_TEMPLATES = {"en": 25, "zh": 40}  # per intent: enough that no phrasing dominates an intent

# Examples per intent; each is split evenly between English and Chinese.
TARGETS = {
    "order_status": 170,
    "cancel_order": 160,
    "refund_request": 164,
    "change_shipping_address": 150,
    "payment_issue": 160,
    "account_login": 150,
    "password_reset": 156,
    "product_availability": 164,
    "delivery_complaint": 166,
    "talk_to_human": 160,
}

# Intents whose customers tend to be annoyed (chooses the emoji pool).
UPSET = {"delivery_complaint", "talk_to_human", "payment_issue", "refund_request"}

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# --------------------------------------------------------------------------- slot fillers

EN_SLOTS = {
    "product": ["wireless headset", "tennis racket", "coffee maker", "phone case", "yoga mat", "desk lamp",
                "backpack", "air fryer", "bluetooth speaker", "winter jacket", "mechanical keyboard",
                "water bottle", "smart watch", "baby stroller", "blender", "gaming mouse", "rice cooker",
                "hoodie", "office chair", "electric toothbrush", "running shoes", "hair dryer", "suitcase",
                "sneakers", "summer dress", "jeans", "face cream", "dog food", "lego set", "monitor",
                "wifi router", "kettle", "power bank", "usb-c cable", "robot vacuum", "humidifier",
                "standing desk", "duvet cover", "earbuds", "kids' bike"],
    "city": ["Austin", "Leeds", "Toronto", "Melbourne", "Denver", "Dublin", "Seattle", "Manchester",
             "Vancouver", "Auckland", "Chicago", "Glasgow", "Phoenix", "Brisbane", "Bristol", "Ottawa",
             "Perth", "Boston", "Cardiff", "Calgary", "Atlanta", "Nottingham"],
    "date": ["yesterday", "last Monday", "last Friday", "two days ago", "on March 3", "on the 12th",
             "last week", "on Sunday", "three days ago", "on June 21", "this morning", "on the 5th",
             "last night", "like a week ago", "on Tuesday", "over the weekend", "10 days ago", "last month"],
    "pay": ["Visa card", "Mastercard", "PayPal", "Apple Pay", "Google Pay", "debit card", "credit card",
            "gift card", "Amex card", "Klarna", "bank card", "store credit"],
    "days": ["3 days", "4 days", "a week", "two weeks", "5 days", "ten days", "over a week", "like 6 days",
             "almost 2 weeks"],
    "carrier": ["UPS", "DHL", "FedEx", "USPS", "Royal Mail", "local", "Canada Post", "Evri", "Amazon"],
    "variant": ["in black", "in white", "in grey", "in navy blue", "in red", "in the large size",
                "in the small size", "in the new version", "in pink", "in the upgraded version", "in XL",
                "in size 9", "in the 2-pack", "in green"],
    "holiday": ["Christmas", "Black Friday", "the holidays", "the end of the month", "Mother's Day",
                "back to school", "my kid's birthday"],
    "when": ["this week", "next month", "before the weekend", "any time soon", "by Friday", "next week"],
    "qty": ["3", "two", "four", "5", "a few", "10"],
    "where": ["on the app", "on the website", "on my iPhone", "on my laptop", "on my Android phone",
              "in the browser", "on the tablet", "on my Mac", "in Chrome", "on my iPad"],
    "err": ["error 403", "'something went wrong'", "'invalid session'", "error code 1002",
            "'account not verified'", "'too many requests'", "'unknown error'", "a blank page"],
    "gadget": ["coffee maker", "bluetooth speaker", "air fryer", "hair dryer", "smart watch", "blender",
               "kettle", "robot vacuum", "monitor", "wifi router", "electric toothbrush", "desk lamp", "earbuds"],
    "place": ["my office", "a pickup point", "my parents' place", "the front desk of my building",
              "my new apartment", "a parcel locker", "my work address", "my sister's house"],
}

ZH_SLOTS = {
    "product": ["无线耳机", "跑步鞋", "咖啡机", "手机壳", "瑜伽垫", "台灯", "双肩包", "空气炸锅",
                "蓝牙音箱", "羽绒服", "机械键盘", "保温杯", "智能手表", "婴儿推车", "破壁机",
                "电饭煲", "卫衣", "办公椅", "电动牙刷", "游戏鼠标", "扫地机器人", "加湿器", "充电宝",
                "数据线", "连衣裙", "牛仔裤", "洗发水", "面膜", "口红", "猫粮", "奶粉", "纸尿裤",
                "四件套", "电热水壶", "吹风机", "行李箱", "钢化膜", "显示器", "路由器", "拖鞋",
                "羽绒被", "洗衣液", "坚果礼盒", "茶叶", "乐高积木", "投影仪", "剃须刀", "电风扇",
                "冲锋衣", "防晒霜", "儿童书包", "床垫", "蚕丝被", "净水器", "登山包", "iPad保护套"],
    "city": ["杭州", "成都", "深圳", "武汉", "南京", "西安", "苏州", "重庆", "厦门", "长沙",
             "青岛", "昆明", "天津", "郑州", "北京", "上海", "广州", "哈尔滨", "乌鲁木齐", "海口",
             "大连", "宁波", "合肥", "南昌", "贵阳", "兰州", "石家庄", "沈阳", "福州", "济南",
             "太原", "南宁", "东莞", "佛山", "无锡", "温州", "义乌", "洛阳", "桂林", "呼和浩特"],
    "date": ["昨天", "前天", "上周一", "上周五", "3月3日", "12号", "上个星期", "周日", "三天前",
             "6月21日", "今天早上", "5号", "大前天", "上礼拜", "昨晚", "上周末", "半个月前", "上个月底",
             "周三", "双十一那天", "十几天前", "今天下午"],
    "pay": ["支付宝", "微信支付", "银联卡", "信用卡", "花呗", "储蓄卡", "Apple Pay", "云闪付", "微信",
            "京东白条", "招行信用卡", "建行卡", "PayPal", "余额", "工行的卡", "Visa卡"],
    "days": ["三天", "四天", "一周", "半个月", "五天", "十天", "一个多星期", "两天", "好几天", "七八天",
             "整整一周", "快半个月"],
    "carrier": ["顺丰", "中通", "圆通", "韵达", "京东", "EMS", "申通", "极兔", "邮政", "德邦", "菜鸟"],
    "variant": ["黑色", "白色", "灰色", "藏青色", "红色", "大号", "小号", "新款", "粉色", "升级版",
                "奶白色", "雾霾蓝", "XL码", "M码", "38码", "42码", "256G", "加厚款", "经典款", "浅绿色"],
    "holiday": ["双十一", "春节", "618", "国庆", "月底", "双十二", "中秋", "开学前", "年前", "五一"],
    "when": ["这周", "下个月", "周末前", "月底前", "最近", "过几天", "下周", "这个月"],
    "qty": ["3", "5", "两", "三", "四", "10", "六"],
    "where": ["APP上", "网页版", "小程序里", "电脑上", "手机上", "平板上", "app里", "iPad上",
              "苹果手机上", "安卓手机上", "华为手机上", "浏览器里", "微信里", "笔记本上"],
    "err": ["系统繁忙", "错误代码403", "会话失效", "网络异常", "账号未验证", "请稍后再试", "账号存在风险",
            "验证失败", "未知错误", "error", "服务器开小差了", "操作频繁"],
    "gadget": ["咖啡机", "蓝牙音箱", "空气炸锅", "吹风机", "智能手表", "破壁机", "电热水壶", "扫地机器人",
               "显示器", "路由器", "电动牙刷", "台灯", "投影仪", "加湿器", "净水器", "剃须刀"],
    "place": ["公司", "学校", "菜鸟驿站", "快递柜", "小区门卫", "老家", "我妈家", "单位", "新家", "宿舍",
              "丰巢柜", "隔壁店铺", "前台"],
    "room": ["502室", "3栋1单元", "12号楼", "B座1801", "7楼", "2单元301", "东门", "18幢"],
}

# --------------------------------------------------------------------------- templates
# English templates are written in lower case with a lower-case "i"; styling capitalises them.
# Most carry no order number: people ask first and look the number up later, if ever.

EN_TEMPLATES = {
    "order_status": [
        "hi, i ordered a {product} {date} as a gift and the tracking still just says 'label created',"
        " can you check if it's actually left your warehouse?",
        "where is my order {order}?",
        "can you tell me the status of order {order}?",
        "has my {product} shipped yet?",
        "i ordered the {product} {date}, when will it arrive?",
        "tracking hasn't updated in {days}, is it still moving?",
        "what's the estimated delivery date for my {product}?",
        "is order {order} out for delivery today?",
        "i haven't got a shipping confirmation yet, has it been dispatched?",
        "could you check where my package is? order {order}",
        "how long until my {product} gets to {city}?",
        "my order has said processing since {date}, when does it ship?",
        "any update on my order {order}?",
        "when can i expect the {product} i bought {date}?",
        "which carrier is delivering my order? do you have a tracking number",
        "is my package still on its way?",
        "wheres my stuff",
        "hey did my order ship yet",
        "been waiting {days} for my {product}, any eta?",
        "tracking says label created for like {days} now, has it actually shipped",
        "when's my package gonna get here",
        "can u check on my order pls",
        "how do i track my order?",
        "still says processing... when does it ship out",
        "is there any way to see where my {product} is right now",
        "my order shows shipped but there's no tracking info yet",
        "will my {product} arrive before {holiday}?",
        "it's been sitting in {city} in transit for {days}, is that normal?",
        "just wondering if my order is on the way",
        "need an eta on my {product} pls",
        "what does 'in transit' mean, when will it actually arrive",
        "order status?",
    ],
    "cancel_order": [
        "so i ordered the {product} this morning but my partner already bought one,"
        " if it hasn't gone out yet can you cancel it and refund my {pay}",
        "i want to cancel my order {order}",
        "please cancel order {order}, i ordered it by mistake",
        "can i still cancel the {product} i ordered {date}?",
        "how do i cancel an order that hasn't shipped yet {where}?",
        "i changed my mind about the {product}, cancel the order",
        "cancel {order} before it ships",
        "i placed the same order twice, please cancel one of them",
        "is it too late to cancel? it hasn't left the warehouse",
        "i found the {product} cheaper elsewhere, i'd like to cancel my order",
        "stop my order, i don't need it anymore",
        "please don't send the package, i want to cancel it",
        "need to cancel the {product} order i placed {date}",
        "how can i cancel the order {where}? i can't find the button",
        "i ordered the wrong size {product}, just cancel the whole order {order}",
        "cancel my order pls",
        "i dont want it anymore, cancel it",
        "accidentally ordered twice lol can u cancel one",
        "how do i cancel?? the button is greyed out",
        "changed my mind, pls cancel before you ship it",
        "can i cancel just the {product} and keep the rest of the order",
        "oops wrong colour, cancel that order and i'll order again",
        "is there a fee to cancel?",
        "i hit buy by mistake, can you undo it",
        "pls dont ship it, im cancelling",
        "i asked to cancel {date} but it still shows pending",
        "cancel the pre-order for the {product}",
        "kill the order, don't need it",
        "ordered the wrong thing, can i still cancel or is it too late",
        "hoping it hasnt shipped yet, i need to cancel the {product}",
    ],
    "refund_request": [
        "sent the {product} back two weeks ago with the prepaid label, tracking shows you got it,"
        " but i still haven't seen a cent back",
        "i'd like a refund for order {order}",
        "i returned the {product} {date}, when will i get my money back?",
        "can i get a refund on the {gadget}? it doesn't work",
        "i sent the package back {date}, where is my refund?",
        "how long does a refund take to show up on my {pay}?",
        "my order was cancelled but i haven't been refunded the {amount} yet",
        "i want my money back for the {product}, it's not as described",
        "please refund {amount} to my {pay} for order {order}",
        "the refund for {order} still hasn't arrived after {days}",
        "can i get a partial refund for the {product}? one piece was missing",
        "how do i request a refund for an order i already received?",
        "you said the refund was approved but i see nothing on my {pay}",
        "i never got the {product} so i want a refund",
        "i want my money back",
        "where's my refund??",
        "how long do refunds usually take",
        "returned it weeks ago and still no refund",
        "the {gadget} broke after {days}, i want a refund not a replacement",
        "can i get a refund without sending it back",
        "refund pls, the item never showed up",
        "item not as described, requesting a full refund",
        "only got part of my money back, where's the rest",
        "can the refund go to my {pay} instead",
        "the price dropped {date}, can i get the difference back",
        "your warehouse got my return {date}, when do i get refunded",
        "refund status?",
        "you guys refunded the wrong amount, it should be {amount}",
        "your site says refund issued but my bank shows nothing",
    ],
    "change_shipping_address": [
        "just noticed the order is going to my old flat, i moved to {city} last month,"
        " can you change it before it ships? i'll send the new address",
        "i need to change the shipping address for order {order}",
        "i moved to {city}, can you update the delivery address on my order?",
        "i typed the wrong address, how do i fix it?",
        "can you ship my {product} to {place} instead of my home?",
        "please send order {order} to my new address in {city}",
        "is it possible to change the delivery address after the order has shipped?",
        "wrong zip code on my order, can you update it",
        "i won't be home {date}, can the package go to my parents' place in {city} instead?",
        "how do i edit the address on an order i just placed {where}?",
        "update the shipping address for {order}, the apartment number is missing",
        "can i redirect my package to a pickup point in {city}?",
        "my {product} is going to my old address, please change it",
        "i'm travelling to {city} next week, can you deliver my order there?",
        "change the address on my order, i entered my old one by accident",
        "wrong address on my order, can u fix it",
        "need to update my shipping address asap",
        "can i change where my package goes",
        "i put my old address by mistake",
        "forgot to add my apartment number, can you add it",
        "moving next week, can i change the delivery address",
        "is it too late to change the address? it already shipped",
        "pls ship to {city} instead, i'm not at home",
        "typo in my street name, pls correct it",
        "the postcode is wrong, can you change it before it goes out",
        "deliver to my neighbour's address instead please",
        "change shipping address pls",
        "can the courier drop it at {place} instead",
        "i need the {product} sent to a different address than the one on the order",
    ],
    "payment_issue": [
        "tried paying three times, each time it said payment failed,"
        " now my bank app shows three pending charges and i have no order",
        "my {pay} keeps getting declined at checkout",
        "i was charged twice for order {order}",
        "payment failed but {amount} was still taken from my account",
        "why won't you accept my {pay}?",
        "checkout gives me an error when i try to pay with {pay} {where}",
        "the money left my {pay} but order {order} still says unpaid",
        "i see a pending charge of {amount} i don't recognize",
        "can't complete payment, the page just spins after i enter my card details",
        "my promo code was applied but i was charged the full price of {amount}",
        "the {pay} payment went through but i never got an order confirmation",
        "is there a problem with {pay} today? my payment keeps failing",
        "i got charged {amount} for the {product} but the price on the site was lower",
        "my bank says you declined the transaction, can you check?",
        "payment has been stuck on processing since {date}",
        "payment keeps failing",
        "why does my card keep getting declined",
        "got charged twice wtf",
        "money taken but the order didnt go through",
        "paypal wont load at checkout",
        "cant pay, it keeps saying {err}",
        "i paid but it still says payment pending",
        "theres a charge on my statement from you guys i dont recognise",
        "checkout wont accept my {pay}",
        "why was i charged {amount} when the total said less",
        "my bank says the payment went thru but your site says it failed",
        "the pay in 4 option isnt working at checkout",
        "the card verification step keeps failing when i pay",
        "charged for shipping twice?",
    ],
    "account_login": [
        ""
        "every time i enter my email and password the page just refreshes and i'm back at the login screen,"
        " tried clearing cookies, nothing",
        "i can't log into my account {where}",
        "it says my account is locked after too many attempts",
        "the verification code never arrives when i try to sign in {where}",
        "the app keeps logging me out every few minutes",
        "the login page shows {err} when i sign in",
        "i know my password is right but it still says invalid credentials",
        "can't sign in with google anymore, it just loops back to the login page",
        "my account got disabled {date}, why can't i log in?",
        "i made an account with my email but now it says no account found",
        "two-factor authentication isn't working, i'm stuck at the login screen",
        "how do i unlock my account?",
        "logging in works on my laptop but the app won't let me in",
        "i keep getting 'session expired' when i try to log in {where}",
        "i can't access my account to check order {order}",
        "cant log in",
        "my account is locked, help",
        "keeps saying wrong password but its definitely right",
        "the login code never comes through",
        "got logged out and cant get back in",
        "app wont let me sign in",
        "sign in with apple isnt working",
        "it says my account doesn't exist??",
        "why is my account suspended",
        "logged in fine yesterday, now it says {err}",
        "stuck on the verification screen forever",
        "new phone and now i cant log in anymore",
        "the captcha keeps failing so i can't get into my account",
        "it keeps kicking me out of my account",
        "i think someone got into my account and now i'm locked out",
    ],
    "password_reset": [
        "haven't used this account in ages and have no idea what the password was,"
        " the reset goes to an old email i can't access, what now",
        "i forgot my password",
        "how do i reset my password {where}?",
        "the password reset link in the email has expired",
        "i never received the reset password email",
        "i want to change my password, where is the option {where}?",
        "the reset link says invalid token when i click it",
        "forgot my password and the code isn't coming to my phone",
        "can you send me a new password reset link?",
        "my new password isn't accepted, it says it doesn't meet the requirements",
        "i think someone knows my password, i need to change it right now",
        "i can't log in because i forgot my password, help me reset it",
        "why is it asking me to reset my password again?",
        "the forgot password button doesn't do anything {where}",
        "set a new password for my account, i lost the old one",
        "forgot my password, help",
        "reset email never came",
        "need a new password",
        "password reset link expired already",
        "the reset link is broken",
        "wheres the forgot password button",
        "can u reset my password for me",
        "it says my new password is too weak",
        "i reset it but the new password doesnt work",
        "i dont remember my password and i dont use that email anymore",
        "the reset code isn't arriving",
        "pls help me reset my password",
        "how do i change my password, i want a stronger one",
    ],
    "product_availability": [
        "been checking every day for the {product} {variant}, it's always out of stock,"
        " are you actually getting more or should i look elsewhere",
        "is the {product} in stock?",
        "when will the {product} be back in stock?",
        "do you have the {product} {variant}?",
        "the {product} says sold out, are you getting more?",
        "can i pre-order the {product}?",
        "can i buy the {product} {variant} in {city}?",
        "is there any stock left of the {product} {variant}?",
        "will you restock the {product} before {holiday}?",
        "is the {product} available in your store in {city}?",
        "notify me when the {product} is available again",
        "why is the {product} {variant} unavailable?",
        "do you still sell the {product} or was it discontinued?",
        "the {product} shows 'only 2 left', can i still order {qty}?",
        "is the {product} {variant} coming back {when}?",
        "is this in stock",
        "when r u restocking the {product}",
        "got the {product} {variant}?",
        "any {product} left?",
        "out of stock again?? when's it back",
        "do u have this in a bigger size",
        "is the {product} discontinued",
        "will there be more {product} {variant} {when}",
        "the {product} page says unavailable, is it coming back",
        "how many {product} do you have left",
        "waiting for the {product} {variant} to come back, any date?",
        "can u let me know when the {product} is available",
        "i need {qty} of the {product}, do you have enough",
        "does the {product} come in other colours or just this one",
    ],
    "delivery_complaint": [
        ""
        "third time this month the driver marked my parcel as 'nobody home' when i was literally sitting by the door,"
        " this is ridiculous",
        "my package arrived damaged, the {product} box was crushed",
        "the courier left my order {order} outside in the rain",
        "tracking says delivered {date} but i never got the package",
        "this is the third time my delivery has been late, really disappointed",
        "the {carrier} driver was rude and threw my package over the fence",
        "order {order} arrived {days} later than promised, unacceptable",
        "i got someone else's package instead of my {product}",
        "the {carrier} driver didn't even knock, just left a note and took my package back",
        "my {product} showed up with the seal broken and scratches all over it",
        "why does delivery to {city} always take so long? this is ridiculous",
        "the package was left at the wrong address",
        "half of my order {order} is missing from the box",
        "the delivery guy marked it as delivered but nothing was at my door",
        "i'm very unhappy with the delivery service, my {product} came soaking wet",
        "the {carrier} courier never showed up in the delivery window {date}",
        "my package came all smashed up",
        "the driver just threw it on the porch",
        "it says delivered but theres nothing here",
        "delivery was super late, not happy",
        "courier never even rang the bell",
        "box was open and stuff was missing",
        "left at the wrong house AGAIN",
        "your courier service is the worst",
        "waited at home all day and no delivery",
        "i want to complain about how my delivery was handled",
        "took {days} to arrive when you promised 2 days",
        "someone signed for my package and it wasn't me",
        "the parcel was dumped in the lobby where anyone could take it",
    ],
    "talk_to_human": [
        "i've explained my problem three times to this bot and it keeps giving me the same links,"
        " i need an actual person to look at this",
        "i want to talk to a real person",
        "can i speak to an agent",
        "connect me to a human",
        "this bot isn't helping, get me a human",
        "is there a phone number i can call to talk to someone?",
        "agent",
        "transfer me to a customer service representative",
        "i need to speak with a manager about order {order}",
        "stop the automated replies, i want a live agent",
        "can a person call me back about my {product}?",
        "human please",
        "is anyone actually there? i need real support",
        "let me chat with a live person, not a bot",
        "how do i reach your support team directly?",
        "i've been going in circles with this chatbot, put me through to someone",
        "real person pls",
        "talk to human",
        "representative",
        "i need a human not a bot",
        "can i call someone?",
        "get me a real agent",
        "is there a live chat with a person",
        "bot is useless, human please",
        "escalate this to a supervisor",
        "i want to speak to your manager",
        "can someone call me",
        "live agent",
        "how do i get a person on the phone",
    ],
}

# Chinese templates read like messages on a Chinese shop's support chat (Taobao/JD style): spoken
# particles (啥, 咋, 呗, 哈, 嘛, 亲), several words for the same thing (取消/撤单/不要了/作废/关闭订单;
# 物流/快递/包裹/运单/揽收/派送/中转), questions, statements and complaints, a few English words, and
# most of them without an order number.

ZH_TEMPLATES = {
    "order_status": [
        "不是说今天发货嘛，怎么还没动静",
        "揽收好两天了还没发出去，啥情况",
        "快递小哥今天会派件吗，我好去取",
        "麻烦帮我跟进一下物流进度",
        "显示已到达{city}集散中心，离我这还远吗",
        "这单走的空运还是陆运，大概几天",
        "商品什么时候寄出？等着穿呢",
        "我的件啥时候能到驿站",
        "看物流好像在派送途中了，大概几点能送到",
        "你好，我{date}在你们家买了个{product}，到现在物流还是显示已揽收，麻烦帮我看一下是不是卡在哪里了，着急用",
        "快递说是{carrier}发的，可是单号在{carrier}官网上查不到，是不是还没交给快递？我等着收货呢",
        "我的快递到哪了",
        "亲，我买的{product}发货没呀",
        "{date}拍的{product}咋还没发货",
        "{order}到哪了？",
        "啥时候发货啊，都{days}了",
        "物流{days}没动了，包裹还在路上吗",
        "快递显示到{city}中转站就不动了，正常吗？",
        "查下物流呗，{date}下的单",
        "请问我的{product}大概几号能到？",
        "我在{city}，一般几天能到哈",
        "显示已揽收之后就没信息了，这是咋了",
        "运单号能发我一下吗",
        "{order}今天能派送吗",
        "我的包裹现在到哪一站了",
        "一直显示派送中，快递员今天会送吗",
        "能帮我催一下发货吗，{product}着急用",
        "下单的时候说48小时内发货，现在还没发",
        "有tracking number吗？我想自己查",
        "帮我看看{order}的物流信息",
        "付了定金的预售{product}啥时候发",
        "付完款一直显示待发货，要等多久",
        "在app里查不到物流，是还没发吗",
        "快递到{city}了没",
        "是哪个快递发的？{carrier}吗",
        "{carrier}的单号查不到信息，是不是还没录入",
        "我买的东西发出来没",
        "订单显示已发货，但物流一直没更新",
        "周末能送到吗？{product}是送人的",
        "{date}的单 还没到 大概还要多久",
        "包裹是不是卡在{city}了，好几天都是同一条信息",
        "麻烦查一下我那个{product}到哪儿了",
        "今天能到不，在家等着呢",
        "请问{order}什么时候能送达？",
        "亲 东西发了没 发了给个单号",
        "物流一直显示运输中，啥时候派送",
        "怎么看物流啊，找不到在哪里查",
        "两个{product}是分开发的吗？只看到一个物流",
        "我{date}下单的，现在什么进度了",
        "仓库出库了吗",
        "还要几天到啊",
        "这单还在打包吗？{order}",
        "已经下单了，想确认一下有没有发货",
        "我的{product}怎么还在{city}转运中心",
        "想问问快递大概哪天到，好安排时间收",
        "{order}状态一直是已出库，正常吗",
        "track不到我的包裹，单号是不是有问题",
        "发货了吗？急用",
        "买的{product}到哪儿了，能给个准信吗",
        "{holiday}前能收到吗",
        "物流信息怎么还停在{date}",
    ],
    "cancel_order": [
        "这单我不买了，麻烦关单",
        "不想买了，这个单子怎么撤回",
        "临时用不上了，还没打包的话帮我取消",
        "能帮我拦截一下吗？没发货就直接取消",
        "下了单才发现优惠没用上，想取消重下",
        "订单里的{product}不要了，其他照常发",
        "我反悔了，订单撤了吧",
        "麻烦把这笔订单撤销掉，谢谢配合",
        "亲，早上下单的{product}，后来发现家里还有一个没拆的，还没发货的话麻烦帮我把订单取消掉，钱原路退回就行",
        "我一下子点了三次购买，生成了三个订单，只要一个就够了，另外两个帮我作废吧",
        "我要取消订单",
        "刚拍的{product}不要了，能取消吗",
        "拍错了，帮我撤单",
        "{order}帮我取消掉，谢谢",
        "还没发货吧？不想要了",
        "怎么取消订单啊，{where}找不到按钮",
        "订单能作废吗，下错了",
        "帮我关闭一下订单",
        "退掉还没发的那单吧",
        "重复下单了，取消一个",
        "不小心下了两单{product}，撤掉一单",
        "家里人已经买了，这单不要了",
        "{date}下的单还能撤回吗",
        "别发货了，我不要了",
        "取消订单要多久处理",
        "想取消{order}，还没出库",
        "刚付完款就后悔了，能取消吗",
        "颜色选错了，取消重新拍吧",
        "申请取消了怎么还显示待发货",
        "下单下错了 cancel一下",
        "能不能把这单取消，别的店更便宜",
        "等太久了，不想等了，取消吧",
        "取消订单的按钮是灰的，点不了",
        "这单先别发，我要取消",
        "{product}拍多了，取消{qty}件可以吗",
        "预售的{product}定金付了，能取消吗",
        "帮我把{order}关了吧",
        "亲 我不想要了 能撤单不",
        "麻烦取消一下刚才那个订单",
        "订单还没发的话直接关掉吧",
        "为啥取消不了订单？",
        "取消了会扣钱吗",
        "下单时规格选错了，先取消，我重新拍",
        "不要了不要了，取消",
        "{date}拍的{product}能撤销吗，买贵了",
        "取消订单在哪里操作",
        "老公已经买过了，这个单子作废吧",
        "{order}取消一下",
        "还没发货能直接取消不",
        "我要撤销这个订单，不用发了",
        "刚才手滑下单了，帮忙取消",
        "没发货之前能取消吗，想换个款",
        "{product}我不要了，订单帮我关闭",
        "点了取消订单没反应",
        "东西还没发吧 取消吧 不想买了",
        "系统自动下了两个单 取消多的那个",
        "能取消订单吗？买错型号了",
        "{order}还没发的话就不要了",
    ],
    "refund_request": [
        "说好的七天内退款嘛，这都十天了",
        "钱什么时候返还给我",
        "这个能退吗？质量太差了，退钱",
        "退款进度能帮我查一下吗",
        "申请了退款，商家一直没审核",
        "坏了一个，能赔点钱吗",
        "东西已经退回，款还没退",
        "退款说三天到账，现在都一周了",
        "有运费险吗？退货的运费能退吗",
        "{gadget}收到用了两天就坏了，开机没反应，之前客服说可以退款，我已经按要求寄回去了，到现在钱还没退，麻烦给个说法",
        "退货物流显示你们{date}就签收了，退款还是一直没动，到底要等多久？",
        "我要退款",
        "退款啥时候到账",
        "{product}已经寄回去了，钱什么时候退",
        "申请退款好几天了还没处理",
        "东西有质量问题，给退钱吗",
        "{product}和图片不一样，我要退货退款",
        "退款退到哪了？{pay}没收到",
        "仅退款可以吗？{product}不想寄回了",
        "显示退款成功，但是没看到钱",
        "商家同意退款了吗",
        "取消的订单钱什么时候退",
        "少发了一件，差的钱退我",
        "{gadget}坏了，能退款不",
        "退货寄回去{days}了，还没退款",
        "我已经填了退货单号，麻烦尽快退款",
        "能退到{pay}吗",
        "refund什么时候到",
        "七天无理由可以退吗",
        "买了没几天就降价了，能退差价吗",
        "退款被拒了，为啥",
        "没收到货，钱退我吧",
        "{order}申请退款",
        "退款一直显示处理中",
        "钱是原路退回吗，多久到",
        "这{gadget}用不了，直接退款吧",
        "快递我拒收了，退款怎么弄",
        "退货退款的流程是啥",
        "赠品没给，能退点钱吗",
        "尺码不合适，想退掉，钱退回{pay}",
        "退款怎么只退了一部分",
        "售后一直不处理我的退款申请",
        "{order}退款到账了吗",
        "想退货，{product}还没拆封",
        "退款申请提交了，要等多久",
        "不想要了，已经发货了，能退款吗",
        "退款金额不对，少退了{amount}",
        "{date}退的货，仓库签收了没有，钱呢",
        "我要求全额退款",
        "帮我把{order}的钱退了",
        "这是假货吧，退钱",
        "退款是退到{pay}还是原路返回",
        "请问refund一般几个工作日",
        "已经过了{days}退款还没到账",
        "退回的运费谁出？我要退货退款",
        "亲 商品有瑕疵 申请退款可以吗",
        "收到的{gadget}是坏的，要退款不要换货",
        "退款的钱去哪儿了",
        "我要申请售后退款",
        "{order}退货已经寄回，请退款",
    ],
    "change_shipping_address": [
        "收件地址能不能换成{city}的{place}",
        "我想把收货地址改成驿站代收",
        "地址信息有误，需要更改",
        "楼层写错了，是{room}，麻烦改下",
        "手机号和地址都要改一下，我换号了",
        "能改配送地址吗？我临时回{city}了",
        "快递还在路上，地址能中途改吗",
        "收货地址能重新填一下吗",
        "你好，我刚下单才发现收货地址还是之前租的房子，我已经搬到{city}了，麻烦发货前帮我把地址改一下，新地址我一会儿发你",
        "下单的时候没注意，收货地址默认成我公司了，这几天放假公司没人，能不能改成寄到我家",
        "地址填错了，能改吗",
        "收货地址写错了，帮我改一下",
        "{order}的地址要改",
        "我搬家了，改寄到{city}的新地址",
        "能改成寄到{place}吗",
        "还没发货吧，帮我改个地址",
        "门牌号写错了，应该是{room}",
        "收件人电话写错了，能改吗",
        "能不能改送到菜鸟驿站",
        "已经发货了还能改地址吗",
        "地址选成老家的了，帮我换成{city}的",
        "寄到{place}吧，家里没人收",
        "{product}能改寄到{city}吗",
        "修改收货地址在哪里操作",
        "下单时用了默认地址，不对，需要改",
        "我人在{city}出差，包裹能转寄过来吗",
        "收货人名字写错了，帮忙改一下",
        "小区名字写错了，能改一下吗",
        "地址少写了楼号，麻烦补上",
        "能把送货上门改成自提吗",
        "{order}麻烦改一下收件地址",
        "帮我把收货地址换一下，新的我发你",
        "地址写的是学校，放假了，能改回家吗",
        "address填错了，怎么修改",
        "能改派到隔壁小区吗",
        "我想换个地址收货",
        "邮编和区都选错了，帮我更正",
        "{date}下的单，地址要改成{place}",
        "已经出库了，还能拦截改地址吗",
        "快递还没到，能让快递员改送到{place}吗",
        "地址是旧的，我上个月已经搬走了",
        "修改地址的按钮是灰的，咋改",
        "{order}寄到{city}去吧，别寄原来的地址了",
        "收货地址能改成我朋友家吗",
        "街道选错了，要改",
        "不好意思 地址打错字了 能改下不",
        "送到单位吧，周末家里没人",
        "帮我改一下收件信息",
        "刚下单发现地址不对 咋改",
        "地址改了没有？我{date}留言说过",
        "{product}别寄到家里了，改寄{place}",
        "能帮我把订单地址更新成新家的吗",
        "地址省份选错了，能帮忙改一下吗",
        "换地址要加运费吗",
        "hi 地址可以改吗 还没发货的话",
        "可以改派到{city}吗 我下周不在原地址了",
        "{order}收件人要换成我家里人",
    ],
    "payment_issue": [
        "不是能用{pay}嘛，怎么付不了",
        "提交订单后付款按钮是灰的",
        "支付时一直显示银行维护中",
        "钱付了两遍，退一笔给我",
        "用{pay}付款，输完密码就卡住了",
        "付款提示超出限额，能分两次付吗",
        "这笔扣款我没授权过",
        "买单的时候报错，说订单异常",
        "付款页面打不开，一直白屏",
        "我用{pay}付了两次都显示失败，但是卡里钱已经扣了，订单那边还是待付款，钱到底去哪了？",
        "付款的时候页面卡住了，刷新以后又让我重新付款，我怕扣两次就没敢付，现在订单是什么情况",
        "付款一直失败咋办",
        "{pay}付不了款",
        "钱扣了，订单还显示待付款",
        "被扣了两次钱",
        "支付的时候提示{err}",
        "为啥用不了{pay}",
        "花呗付款失败，说额度不够，可我额度明明够",
        "付款页面一直转圈圈",
        "银行卡扣了{amount}，但是没下单成功",
        "优惠券没用上，多扣了钱",
        "重复扣款了，帮我看看",
        "分期付款选不了",
        "付款成功了但订单没了",
        "显示支付超时，钱却扣了",
        "信用卡被拒了，换了一张还是不行",
        "没买东西啊，怎么有一笔{amount}的扣款",
        "付款的时候跳不到{pay}",
        "PayPal付款不成功",
        "能用{pay}付吗？试了好几次都不行",
        "扣款金额和订单价格对不上",
        "订单显示{amount}，实际扣得更多",
        "{order}付款了但显示未支付",
        "付款时提示银行卡异常",
        "微信扣款成功了，订单还是待付款",
        "付不了钱，是不是系统有问题",
        "结算页面点提交订单没反应",
        "我的卡没问题啊，就是一直付不了",
        "{order}扣了两回钱",
        "运费怎么扣了两次",
        "银行短信说扣款了，你们这边却没到账",
        "付款要验证好多次，验证完还是失败",
        "付款时提示“交易存在风险”",
        "朋友帮我代付，link打不开",
        "用了红包还是按原价扣款",
        "余额够的，但是付款失败",
        "想用{pay}付款，结算页没这个选项",
        "扣款{amount}了，订单状态没变",
        "支付失败，钱被冻结了，啥时候解冻",
        "付完款没收到任何确认",
        "一直显示支付处理中，已经{days}了",
        "刷卡付款被拒，银行说没问题",
        "{order}的付款卡住了",
        "下单付钱老是报错",
        "海外卡能付款吗？visa一直失败",
        "扣了我的钱又没下单成功，怎么回事啊",
        "pay不了 提示网络异常",
        "{order}支付成功了，怎么还让我付",
    ],
    "account_login": [
        "账号上不去了",
        "进不了我的账户",
        "登录页面一直加载不出来",
        "手机收不到短信，登不了号",
        "登录提示操作频繁，让我稍后再试",
        "账号被盗了，登不上",
        "密码输对了也进不去，说账号已注销",
        "平板上登录一直白屏",
        "我的账号平时一直用手机号加验证码登录的，今天突然提示账号存在风险，要我去验证身份，验证完了还是登不进去，怎么弄",
        "家里电脑和手机都试过了，输账号密码以后页面闪一下又回到登录界面，清了缓存也没用",
        "登录不上了",
        "账号登不进去",
        "{where}登录一直失败",
        "账号被锁定了怎么办",
        "登录提示{err}",
        "收不到登录验证码",
        "手机号换了，账号登不上了",
        "微信登录一直跳回首页",
        "账号被冻结了？为啥",
        "密码是对的，就是登不上",
        "app一打开就闪退，根本登不了",
        "登录的时候验证码一直说错误",
        "换了新手机以后登不上账号",
        "一登录就说账号异常",
        "扫码登录没反应",
        "老把我踢下线",
        "登录后一会儿就自动退出",
        "提示账号不存在，我明明注册过",
        "账号被封了，怎么解封",
        "两步验证收不到短信",
        "电脑能登，手机app上不去",
        "滑块验证一直过不去，登不进去",
        "登录界面一直在转圈",
        "我的账号好像被别人登了，现在我自己登不上",
        "登录页面的login按钮点了没反应",
        "登进去又跳出来了",
        "用手机号登录提示未注册",
        "账号被限制登录了",
        "第三方登录绑定不上",
        "每次登录都要重新验证，好烦",
        "输错几次账号就被锁了",
        "登不上账号，查不了{order}",
        "会员账号进不去了",
        "登录提示网络错误，但网络明明是好的",
        "昨天还能登，今天就登不上了",
        "{where}一直提示请重新登录",
        "人脸验证过不了，登不进",
        "账户登录异常，让我去申诉",
        "为什么我的账号登录不上",
        "切换账号之后原来的账号登不了了",
        "登录一直卡在验证码那一步",
        "帐号异常 被强制下线了",
        "登录时说设备不安全，不让登",
        "账号怎么解锁啊",
        "{date}开始就登不上去了",
        "想查{order}，但是账号登不上",
    ],
    "password_reset": [
        "密码不记得了，怎么重新设置",
        "修改密码一直提示原密码错误",
        "找回密码的验证码发到哪了",
        "想把登录密码改掉",
        "重置密码页面一直转圈",
        "新密码设置成功了吗？没有提示",
        "找回密码需要身份证吗",
        "密码丢了，能重置吗",
        "好久没用这个账号了，密码完全不记得了，点了找回密码要发验证码到以前的手机号，那个号早就停了，还有别的办法重置吗",
        "收到短信说我的密码被修改了，可我自己没改过，麻烦先帮我重置一下密码",
        "忘记密码了",
        "密码忘了咋办",
        "怎么重置密码",
        "重置密码的邮件没收到",
        "重置链接过期了",
        "想改个密码，在哪里改",
        "找回密码收不到验证码",
        "点忘记密码没反应",
        "新密码设置不了，老提示不符合要求",
        "密码好像泄露了，我要改密码",
        "重设密码的link打不开",
        "密码想不起来了，帮我重置一下",
        "重置密码要验证原手机号，但我手机号不用了",
        "能发一个新的重置链接吗",
        "为什么又让我改密码",
        "密码改了好几次都提示失败",
        "密码错太多次了，想重新设一个",
        "支付密码忘了怎么重置",
        "找回密码的页面打不开",
        "重置密码提示链接无效",
        "设置新密码的时候说和旧密码一样",
        "修改登录密码在{where}哪里",
        "忘了密码，邮箱也换了，怎么找回",
        "我要修改密码",
        "reset password的邮件在哪",
        "密码要多长才行？一直说太简单",
        "新密码确认了但是没生效",
        "找回密码时安全问题忘了",
        "改密码的验证码一直没来",
        "密码全忘光了，账号还想用",
        "能帮我把密码重置了吗",
        "密码记不得了 咋找回",
        "怎么设置新密码",
        "重置密码的短信收不到",
        "怀疑被盗号了，先帮我把密码改了",
        "改了密码之后还要重新登录吗",
        "点了重置密码，页面报错{err}",
        "邮箱里没找到重置密码的邮件",
        "找回密码也不行，一直提示{err}",
        "{where}找回密码在哪",
        "忘记密码 验证码一直发不出来",
        "旧密码忘了没法修改",
        "重置完密码还是提示密码错误",
        "密码到底怎么改？",
        "我想换个复杂点的密码",
    ],
    "product_availability": [
        "这个不是上周刚补过货嘛，又没了？",
        "这个尺码还有吗",
        "{product}卖光了？",
        "什么时候上新",
        "{product}下批货啥时候到",
        "还能买到{product}吗，到处都缺货",
        "有没有{variant}的库存",
        "为啥加不了购物车，是没货了吗",
        "现货还是预售？",
        "想给孩子买{product}，{variant}一直显示无货，{holiday}之前能补上吗？补不上我就只能去别家买了",
        "直播间说{product}{when}会返场，到时候还有{variant}吗？上次没抢到",
        "{product}有货吗",
        "{product}啥时候补货",
        "这款还有{variant}吗",
        "{product}{variant}没货了？",
        "显示缺货，什么时候到货",
        "预售的{product}还能订吗",
        "{product}还会再上架吗",
        "断货多久了，还进不进货",
        "{variant}的{product}还有几件",
        "{holiday}前能补货吗",
        "我要{qty}个{product}，库存够吗",
        "有现货吗，今天下单能发吗",
        "这个停产了吗",
        "{city}有线下店可以买到吗",
        "到货提醒怎么设置",
        "为什么{product}一直显示无货",
        "{product}有{variant}的吗",
        "亲 这个还有货不",
        "能帮我留一件{product}吗",
        "{product}是不是下架了，搜不到",
        "补货了通知我一下呗",
        "刚看还有，现在就没了？",
        "大号卖完了？还会有吗",
        "什么时候能买到{product}",
        "新款{product}什么时候开卖",
        "这个颜色以后还出吗",
        "现在下单有货吗，还是要等",
        "库存显示0，还能下单吗",
        "限购几件？我想多买点",
        "{product}怎么老是秒没",
        "能预订吗？{when}要用",
        "这个{product}现在in stock吗",
        "link里的{product}还卖吗",
        "{variant}还会补吗",
        "你们家{product}还有存货吗",
        "配件单独卖吗，现在有货没有",
        "这款卖断货了吗",
        "{product}{when}能到货吗",
        "同款{variant}还有没有",
        "是不是只有{variant}有货了",
        "这个商品还有吗 想买",
        "没现货的话要等多久",
        "{product}什么时候再上",
        "缺货的话能调货吗，{city}的店有没有",
        "页面显示即将售罄，还剩多少",
        "有没有库存啊 急用",
        "{product}{variant}{when}会有货吗",
    ],
    "delivery_complaint": [
        "快递员不送货上门还不接电话，我要投诉",
        "包裹外箱全是水，里面也潮了",
        "{gadget}的玻璃碎了，快递太粗暴",
        "派件员服务太差，给差评",
        "送货的把包裹扔在草地上",
        "都超时两天了还没送到，太耽误事了",
        "快递员假签收，我要投诉",
        "送到了邻居家也没通知我",
        "快递员电话都不打一个，直接把包裹扔在小区门口，等我下班回来{product}已经被雨淋湿了，这服务也太差了吧，必须给个说法",
        "每次都说今天派送，结果等一天没人来，打电话问就说车坏了，这都第三回了",
        "快递员态度太差了",
        "包裹被压坏了，{product}都变形了",
        "显示已签收，我根本没收到",
        "快递放驿站也不通知一声",
        "没送上门，直接扔快递柜了",
        "送货太慢了，{days}才到",
        "{carrier}的快递员不接电话",
        "收到的箱子是破的，里面的东西少了",
        "快递被别人拿走了，你们也不管",
        "快递员说送到了，其实送到别的小区去了",
        "{product}到的时候都湿透了",
        "又晚送了，这都第几次了",
        "说好次日达，结果{days}才到，骗人吧",
        "快递员没打电话就把包裹退回去了",
        "快递员让我自己下楼拿，说不送上门",
        "{order}的包裹丢了吧，都这么多天了",
        "外包装好好的，里面{gadget}碎了",
        "送错了，收到的不是我的东西",
        "签收前快递员不让开箱验货",
        "派送员乱扔包裹，{gadget}摔坏了",
        "物流太慢了，到{city}走了一个礼拜",
        "投诉快递员，{date}说好上门没来",
        "包裹被放在门口淋雨了",
        "快递员私自签收",
        "我要投诉{carrier}",
        "少了一件东西，箱子明显被拆过",
        "快递员骂人，太过分了",
        "快递员把东西扔在楼下就走了",
        "配送超时了，也没人解释",
        "快递员要我加钱才送上门",
        "说好的送货上门呢？让我去驿站取",
        "收到的时候包装都烂了",
        "{order}到现在都没送到，已经晚了{days}",
        "快递慢死了，等得花都谢了",
        "快递延误了也不说一声，差评",
        "包裹被快递员弄丢了，谁负责",
        "这delivery也太差了吧",
        "签收的不是我本人，快递员乱签",
        "快递员打电话态度很凶",
        "东西送到了但{gadget}缺零件",
        "配送员放错楼了",
        "物流显示派送成功，家里没人收到",
        "包裹在驿站放了{days}才通知我",
        "气死了，{gadget}送来就是坏的",
        "为啥每次{carrier}都这么慢",
        "{carrier}快递员把包裹放门卫就走了，也没说",
        "我在家等了一天，快递员说家里没人",
        "{order}的箱子里少了一半东西",
        "{order}显示签收了但我没拿到",
    ],
    "talk_to_human": [
        "有人工嘛",
        "请转人工客服处理",
        "人工在吗",
        "能不能别让机器人回答",
        "麻烦找个客服专员",
        "我需要真人帮忙",
        "你们有人工吗",
        "不要智能客服，要真人",
        "转售后客服",
        "跟你们机器人说了半天，回答的都是没用的，我的问题比较复杂，麻烦给我转个真人客服",
        "我已经等了二十分钟了，能不能有个人出来回我一句话",
        "转人工",
        "人工客服",
        "找真人客服",
        "机器人听不懂，转人工吧",
        "能不能让人工来回复",
        "有客服电话吗",
        "叫你们主管来",
        "别发自动回复了",
        "有真人在吗",
        "人工人工人工",
        "我要跟客服说话，不要机器人",
        "怎么联系人工客服",
        "打你们客服电话一直没人接",
        "转接人工",
        "机器人回答的都不对，我要找人",
        "能让客服打个电话给我吗",
        "我要投诉，找你们负责人",
        "有没有在线客服",
        "找个人跟我说，别机器人了",
        "客服呢？怎么都是自动回复",
        "人工客服几点上班",
        "{order}的问题需要人工处理",
        "等了半天人工还没接",
        "请帮我转到售后人工",
        "我不跟机器人聊",
        "能找个懂的人来吗",
        "人工服务在哪",
        "排队排了好久，人工能快点吗",
        "直接给我转人工就行",
        "我要和真人沟通",
        "想找客服小姐姐，不要机器人",
        "这个问题机器人解决不了，找人工",
        "能不能加客服微信",
        "你是机器人吧？换个人来",
        "找店长",
        "请安排专人联系我",
        "电话客服是多少",
        "agent 人工",
        "要人工，别问我问题了",
        "关于{product}的事想跟人工说",
        "一直绕圈子，帮我接人工",
        "到底有没有人管啊",
        "人工客服在不在",
        "别让机器人回了",
        "转人工转人工",
        "{order}的事我要找你们主管",
    ],
}

# --------------------------------------------------------------------------- dressing

EN_PREFIXES = ["hi, ", "hello, ", "hey, ", "hi there, ", "good morning, ", "excuse me, ", "hello team, ",
               "hey support, ", "quick question, ", "hey guys ", "um ", "ok so ", "sorry to bother you, ",
               "hi support, ", "yo "]
EN_SUFFIXES = ["Thanks!", "Thank you.", "Thanks in advance.", "Please help.", "thx", "thanks", "Cheers.",
               "please", "Appreciate it.", "asap", "ty", "pls help!!", "urgent", "thank u"]
ZH_PREFIXES = ["您好，", "你好，", "在吗？", "客服你好，", "亲，", "麻烦问一下，", "你好 ", "hello，",
               "亲亲，", "在吗 ", "在不在？", "客服，", "hi ", "哈喽，", "问下，", "老板，", "那个，",
               "掌柜的，", "你好呀，", "急！", "客服在吗？"]
ZH_SUFFIXES = ["谢谢", "谢谢！", "麻烦了", "辛苦了", "谢谢啦", "急！", "麻烦看一下", "多谢", "谢啦", "急急急",
               "在线等", "麻烦尽快", "谢谢亲", "感谢", "辛苦啦", "拜托了", "尽快回复哈"]
CALM_EMOJI = ["🙏", "😊", "🙂", "😅", "🤔"]
UPSET_EMOJI = ["😡", "😤", "😞", "🙄", "😩"]
CALM_STICKERS = ["[抱拳]", "[捂脸]", "[微笑]"]  # chat apps' sticker codes, as they show in Chinese text
UPSET_STICKERS = ["[发怒]", "[流泪]", "[白眼]"]

# Misspellings people really type; applied to a few English utterances.
EN_TYPOS = {
    "receive": "recieve", "received": "recieved", "address": "adress", "password": "pasword",
    "cancel": "cancle", "refund": "refnud", "please": "pls", "order": "oder", "package": "pakage",
    "delivery": "delivary", "account": "acount", "available": "availble", "shipping": "shiping",
    "payment": "paymnet", "where": "wher", "because": "becuase", "charged": "chraged",
    "tracking": "traking", "tomorrow": "tommorow", "something": "somthing", "person": "peron",
    "really": "realy", "definitely": "definately", "until": "untill", "arrived": "arived",
    "which": "wich", "you": "u", "your": "ur", "are": "r", "through": "thru", "supposed": "suposed",
    "stock": "stok", "again": "agian", "changed": "chnaged", "login": "loggin", "already": "allready",
}

# Homophone and input-method slips (错别字) and chat spellings; one per utterance, on a few of them.
ZH_TYPOS = {
    "登录": "登陆", "账号": "帐号", "账户": "帐户", "订单": "定单", "已经": "以经", "什么": "神马",
    "一下": "以下", "取消": "取xiao", "密码": "秘码", "地址": "地止", "发货": "发或", "快递": "快第",
    "收到": "收道", "人工": "人公", "包裹": "包过", "的时候": "得时候", "没有": "木有", "这样": "酱紫",
    "谢谢": "蟹蟹", "验证码": "验正码", "退款": "退宽", "补货": "补或", "在吗": "在嘛", "好的": "好滴",
    "东西": "东东", "还没": "还木", "怎么": "怎摸", "客服": "客腹", "物流": "无流", "付款": "付宽",
}

# English words Chinese customers type in the middle of a sentence; one per utterance, on a few.
ZH_MIXED = {
    "退款": "refund", "链接": "link", "物流信息": "tracking", "验证码": "code", "好的": "ok",
    "取消": "cancel", "地址": "address", "密码": "password", "APP": "app", "账号": "ID",
    "有货": "有stock", "登录": "login", "快递单号": "tracking number",
}

# Intents where a customer may paste an order number after the message whatever the template says.
ORDER_TAIL = {"order_status", "cancel_order", "refund_request", "change_shipping_address", "payment_issue",
              "delivery_complaint"}

_I_WORDS = re.compile(r"\bi(?=\b|')")


def fake_order(rng: random.Random, lang: str) -> str:
    """Obviously fake order references: #A1234 in English, 订单号 58231 in Chinese."""
    if lang == "en":
        code = rng.choice("ABCDEFGHJKMN") + str(rng.randint(1000, 9999))
        return rng.choices([f"#{code}", code], weights=[4, 1])[0]
    number = str(rng.randint(10000, 99999))
    return rng.choices([f"订单号 {number}", f"订单{number}", f"订单号{number}", f"单号{number}"],
                       weights=[4, 2, 2, 1])[0]


def fake_amount(rng: random.Random, lang: str) -> str:
    if lang == "en":
        return f"${rng.randint(9, 260)}.{rng.choice(['00', '99', '50', '49'])}"
    value = rng.randint(19, 1999)
    return rng.choice([f"{value}元", f"¥{value}", f"{value}块", f"{value}块钱", f"{value}.00元"])


def fill(template: str, rng: random.Random, lang: str) -> str:
    slots = EN_SLOTS if lang == "en" else ZH_SLOTS

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "order":
            return fake_order(rng, lang)
        if name == "amount":
            return fake_amount(rng, lang)
        return rng.choice(slots[name])

    return re.sub(r"\{(\w+)\}", one, template)


def add_typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    known = [i for i, w in enumerate(words) if w.strip(",.?!'").lower() in EN_TYPOS]
    if known:
        i = rng.choice(known)
        bare = words[i].strip(",.?!'")
        words[i] = words[i].replace(bare, EN_TYPOS[bare.lower()], 1)
        return " ".join(words)
    long = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5]
    if not long:
        return text
    i = rng.choice(long)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]  # swap two neighbouring letters
    return " ".join(words)


def add_order(text: str, rng: random.Random, lang: str) -> str:
    """The order number pasted before or after a message whose template names none."""
    order = fake_order(rng, lang)
    if lang == "en":
        return rng.choice([f"{text} order {order}", f"{text} ({order})", f"{order} - {text}"])
    return rng.choice([f"{text}，{order}", f"{text} {order}", f"{order} {text}", f"{order}，{text}"])


def swap_one(text: str, table: dict[str, str], rng: random.Random) -> str:
    """``text`` with the first occurrence of one of ``table``'s keys (chosen at random) replaced."""
    present = [key for key in table if key in text]
    if not present:
        return text
    key = rng.choice(present)
    return text.replace(key, table[key], 1)


def dress_en(core: str, intent: str, rng: random.Random, names_order: bool) -> str:
    text = core
    if intent in ORDER_TAIL and not names_order and rng.random() < 0.06:
        text = add_order(text, rng, "en")
    r = rng.random()
    if r < 0.4:
        suffix = rng.choice(EN_SUFFIXES)
        if suffix == "please" and intent == "delivery_complaint":
            suffix = "Please help."  # a bare "please" reads oddly after a complaint
        if suffix == "please":
            text = text[:-1] + ", please?" if text.endswith("?") else text + " please"
        else:
            if not text.endswith(("?", ".", "!")):
                text += "," if suffix[0].islower() else "."
            text += " " + suffix
    if rng.random() < 0.4:
        text = rng.choice(EN_PREFIXES) + text
    if rng.random() < 0.12:
        text = add_typo(text, rng)
    if rng.random() < 0.08:
        text += " " + rng.choice(UPSET_EMOJI if intent in UPSET else CALM_EMOJI)
    if rng.random() < 0.25:  # typed in a hurry: lower case, no punctuation
        text = re.sub(r"[,.?!]+(?=\s|$)", "", text.lower())  # "$12.49" keeps its point
    else:
        text = _I_WORDS.sub("I", text)
        text = re.sub(r"([.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        if rng.random() < 0.85:  # the rest leave the first letter as they typed it
            text = text[0].upper() + text[1:]
    return " ".join(text.split())


ZH_HALF_WIDTH = str.maketrans({"，": ",", "？": "?", "！": "!", "。": "."})


def dress_zh(core: str, intent: str, rng: random.Random, names_order: bool) -> str:
    text = core
    if intent in ORDER_TAIL and not names_order and rng.random() < 0.06:
        text = add_order(text, rng, "zh")
    suffixed = rng.random() < 0.35
    if suffixed:
        suffix = rng.choice(ZH_SUFFIXES)
        if not text.endswith(("？", "。", "！")):
            text += rng.choice(["，", " "])
        text += suffix
    if rng.random() < 0.4:
        text = rng.choice(ZH_PREFIXES) + text
    if rng.random() < 0.12:
        text = swap_one(text, ZH_TYPOS, rng)
    if rng.random() < 0.08:
        text = swap_one(text, ZH_MIXED, rng)
    if rng.random() < 0.1:
        text += rng.choice(UPSET_EMOJI + UPSET_STICKERS if intent in UPSET else CALM_EMOJI + CALM_STICKERS)
    style = rng.random()
    if style < 0.15:  # no punctuation, spaces instead
        text = re.sub(r"[，。？！、“”]", " ", text)
    elif style < 0.27:  # typed with the half-width punctuation of an English keyboard
        text = text.translate(ZH_HALF_WIDTH)
    elif style < 0.35 and not suffixed:  # a trailing flourish
        text = text.rstrip("？！。，") + rng.choice(["？？", "？？？", "！！", "。。。", "…", "~", "～", "?"])
    return " ".join(text.split())


def normalize(text: str) -> str:
    """Form used for de-duplication: NFKC, case-folded, punctuation/symbols/emoji removed, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def generate(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for intent, total in TARGETS.items():
        for lang, templates in (("en", EN_TEMPLATES[intent]), ("zh", ZH_TEMPLATES[intent])):
            want = total // 2 if lang == "en" else total - total // 2
            assert len(templates) >= MIN_TEMPLATES[lang], f"{intent}/{lang}: only {len(templates)} templates"
            order = list(templates)
            rng.shuffle(order)
            used: Counter[str] = Counter()
            made = attempts = 0
            while made < want:  # top up until the target is met, skipping duplicates
                attempts += 1
                if attempts > 200 * want:
                    raise RuntimeError(f"{intent}/{lang}: stuck at {made}/{want} unique utterances")
                template = order[attempts % len(order)]
                core = fill(template, rng, lang)
                names_order = "{order}" in template
                dress = dress_en if lang == "en" else dress_zh
                text = dress(core, intent, rng, names_order)
                key = normalize(text)
                if not key or key in seen or len(text) > MAX_CHARS or language(text) != lang:
                    continue
                seen.add(key)
                used[template] += 1
                rows.append({"text": text, "label": intent})
                made += 1
            unused = [t for t in templates if not used[t]]
            assert not unused, f"{intent}/{lang}: templates never used: {unused}"
    rng.shuffle(rows)
    check(rows)
    return rows


def check(rows: list[dict[str, str]]) -> None:
    keys = [normalize(r["text"]) for r in rows]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, f"normalised duplicates: {dupes[:5]}"
    per_label = Counter(r["label"] for r in rows)
    assert set(per_label) == set(TARGETS), sorted(per_label)
    for label, n in per_label.items():
        assert MIN_PER_INTENT <= n <= MAX_PER_INTENT, f"{label}: {n} examples"
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        assert abs(langs["en"] - langs["zh"]) <= n * 0.1, f"{label}: unbalanced languages {dict(langs)}"
    assert len(rows) >= MIN_TOTAL, f"only {len(rows)} rows"
    for r in rows:
        assert list(r) == ["text", "label"], r
        assert r["text"].strip() and len(r["text"]) <= MAX_CHARS, r
        assert "@" not in r["text"], r  # no e-mail addresses
        assert not re.search(r"\d{7,}", r["text"]), r  # nothing that looks like a phone number


def main() -> int:
    rows = generate()
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_label = Counter(r["label"] for r in rows)
    print(f"wrote {len(rows)} utterances to {OUTPUT}", file=sys.stderr)
    for label in TARGETS:
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        print(f"  {label:<24} {per_label[label]:>4}  en {langs['en']:>3}  zh {langs['zh']:>3}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
